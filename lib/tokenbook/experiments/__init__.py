"""What each notebook calls: one module per notebook, named by the notebook's stem (``NN_<stem>.ipynb`` ->
``tokenbook.experiments.<stem>``), imported in every notebook as ``from tokenbook.experiments import <stem> as exp``.

| module | notebook |
|---|---|
| ``baselines`` | ``00_baselines``: timm reference ViTs, a small ViT on the default data, attention maps |
| ``vittm`` | ``01_vittm``: ViTTM efficiency, ViTTM vs ViT, ablations, read/write maps, recipes |
| ``t2t_vit`` | ``02_t2t_vit``: Tables 1-7, from-scratch ablations, Figure 2 features, attention, recipes |
| ``toe`` | ``03_toe``: schedules and compute, with/without-ToE training, overhead, selection figures |
| ``seit`` | ``04_seit``: token data, storage, the SeiT / ColorAdapt / TokenAdapt ablation, figures |
| ``memory`` | ``05_memory``: fine-tuning table, concatenation and extension studies, figures |

Experiments modules may import everything else; nothing outside ``experiments`` imports them.
"""
