"""Model families of the workbook's papers, registered with timm on import.

``import tokenbook.models`` registers every family, after which ``timm.create_model(name)`` works for the names
each module registers (``timm.list_models("vittm_*")`` etc.).
"""
import importlib

#: family module -> what it holds
MODEL_FAMILIES = {
    "vit_small": "small timm ViTs sized for the default data (baselines)",
    "vittm": "ViTTM: memory + process token streams (vittm_*)",
    "t2t_vit": "T2T-ViT: tokens-to-token ViTs, all official names and Table 6/7 variants (t2t_vit_*)",
    "toe": "DeiT-T/S/B with ToE token expansion attached (toe_deit_*_patch16_224)",
    "seit": "SeiT token ViTs (deit_*_token_32, deit_fm_*_token_32), T2T-ViT on tokens (t2t_vit_fm_token_32), TokenAdapt f/g",
    "memory": "Learnable Memory: MemoryViT for timm ViTs and T2T-ViTs (a wrapper; no registered names)",
}

for _name in list(MODEL_FAMILIES):
    importlib.import_module(f"{__name__}.{_name}")
