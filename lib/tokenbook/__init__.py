"""tokenbook: a reproducibility workbook for token-centric vision transformers.

Layout (one rule for every paper; nothing heavy is imported here):

- shared core, which never imports the paper code below:
  ``tokenbook.data`` (datasets, transforms, loaders; ``data.tokens`` SeiT token files and the VQ tokenizer,
  ``data.tasks`` per-task splits), ``tokenbook.train`` (one ``fit()``), ``tokenbook.bench`` (params, MACs/FLOPs with
  attention, latency, throughput), ``tokenbook.results`` (atomic tables + metadata, paper-vs-ours),
  ``tokenbook.references`` (paper numbers as data), ``tokenbook.repro`` (seeding), ``tokenbook.viz`` (attention
  maps, curves), ``tokenbook.runner`` (the papermill batch runner);
- ``tokenbook.models.<family>``: architectures, timm registration, pretrained cfgs, checkpoint filters;
- ``tokenbook.methods``: methods that attach to any timm model (ToE's token selection, token-space augmentations);
- ``tokenbook.experiments.<stem>``: what notebook ``NN_<stem>`` calls.
"""

__version__ = "0.1.0"
