"""SeiT's released checkpoints and the weight file of ``run_all.sh --proof`` (a part of
:mod:`tokenbook.experiments.seit`, which re-exports it): :data:`RELEASED`, :func:`released_table` (the token-trained
ViT-Bs on the token release's val split, by :mod:`tokenbook.released`) and :func:`proof_data`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from tokenbook.io import atomic_save

__all__ = ["RELEASED", "released_table", "proof_data"]


# ----------------------------------------------------------------------------------------------------------
# Released checkpoints vs the paper (issue 20): the token-trained ViT-Bs, evaluated on the token release's val
# split by tokenbook.released (token_val_dir = the unpacked IMNET1K-tokens.tar, with codebook.ckpt)
# ----------------------------------------------------------------------------------------------------------
RELEASED = [
    dict(model="deit_base_token_32.seit_in1k", file="trained-vit.ckpt", ref="seit:tabB.seit.1.4gb", data="tokens",
         paper_name="SeiT (ViT-B, 1.4 GB)", url="https://github.com/naver-ai/seit/releases/tag/v0.0 "
                                              "(SeiT_weights.tar: trained-vit.ckpt)",
         note="third-party number (SeiT++ review note), not checked against the PDF"),
    dict(model="deit_base_token_32.tokenadapt_in1k", file=None, ref="seit:tabB.seit_ta_ca.1.4gb", data="tokens",
         paper_name="SeiT + TokenAdapt + ColorAdapt (ViT-B, 1.4 GB)",
         url="https://github.com/gaviotas/tokenadapt/releases/tag/v0.0 (file name not in the reference sheet)",
         note="pass paths={'deit_base_token_32.tokenadapt_in1k': <file>}; [inferred] the release is taken to be the "
              "Table B row of the Forging Tokens setting; third-party number, not checked against the PDF"),
]


def released_table(params: Optional[dict] = None, **kw: Any):
    """:data:`RELEASED` evaluated on the token release's val split (:func:`tokenbook.released.released_table`;
    arguments from ``params`` by :func:`tokenbook.released.params_kwargs`: ``token_source: "release:<root>"``)."""
    import tokenbook.models  # noqa: F401  (registers the token ViTs)
    from tokenbook import released as R

    return R.released_table(RELEASED, **R.params_kwargs(params, **kw))



# ----------------------------------------------------------------------------------------------------------
# run_all.sh --proof: the weight file the full profile names
# ----------------------------------------------------------------------------------------------------------
def proof_data(root: Union[str, os.PathLike]) -> list[str]:
    """The runner's ``--proof`` hook: ``<root>/seit/weights/tokenadapt.ckpt``, a TokenAdapt of the official sizes
    (seeded random weights under the official ``conversion_function.*`` / ``reverse_transform.*`` names, in a
    ``{"model": ...}`` dict as the release) when the file is missing. The token release itself is the proof tree's
    (:func:`tokenbook.data.synthetic.write_proof_data`). Returns what was written."""
    from tokenbook.models.seit import TokenAdapt

    path = Path(root).expanduser() / "seit" / "weights" / "tokenadapt.ckpt"
    if path.is_file():
        return []
    torch.manual_seed(0)
    state = {"model": TokenAdapt().state_dict()}
    atomic_save(path, lambda tmp: torch.save(state, tmp))
    return ["seit/weights/tokenadapt.ckpt"]

