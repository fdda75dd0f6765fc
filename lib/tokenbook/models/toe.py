"""ToE models: importing this registers ``toe_deit_{tiny,small,base}_patch16_224`` (defined in ``tokenbook.toe``)."""
from tokenbook.toe import *  # noqa: F401,F403
