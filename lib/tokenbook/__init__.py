"""tokenbook: a reproducibility workbook for token-centric vision transformers.

Library modules (import what you need; nothing heavy is imported here):

- ``tokenbook.data``       datasets (Fashion-MNIST default, image folders, hub ids), transforms, loaders
- ``tokenbook.train``      one ``fit()`` for every notebook (Lightning Fabric + timm)
- ``tokenbook.bench``      parameter counts, MACs/FLOPs (attention included), latency, throughput, memory
- ``tokenbook.results``    atomic tables + metadata, paper-vs-ours joins
- ``tokenbook.references`` paper numbers as data
- ``tokenbook.repro``      seeding and determinism
- ``tokenbook.viz``        attention maps, rollout, curves
- ``tokenbook.models``     timm-registered model families of the papers
"""

__version__ = "0.1.0"
