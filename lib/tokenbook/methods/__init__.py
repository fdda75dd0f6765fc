"""Methods that attach to any timm model rather than being an architecture of their own.

- ``tokenbook.methods.toe``: ToE's ``TokenSelect`` (token expansion during training), its stage hook, schedules and
  compute accounting, for any timm ``VisionTransformer``.
- ``tokenbook.methods.token_aug``: token-space augmentations of SeiT (Token-EDA, crops / flips in token space,
  Mixup/CutMix on tokens, ColorAdapt, embedding noise) and TokenAdapt's f-space spatial augmentations.
- ``tokenbook.methods.memory_finetune``: Learnable Memory's fine-tuning modes (``set_trainable``, ``finetune_model``)
  on a ``MemoryViT`` around any timm backbone.
"""
