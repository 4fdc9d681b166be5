from ._zoo import PACKAGED_WEIGHTS as PACKAGED_WEIGHTS
from ._zoo import load_checkpoint as load_checkpoint
from ._zoo import load_model as load_model
from ._zoo import read_state_dict as read_state_dict
from ._zoo import resolve_data_config as resolve_data_config

__all__ = ["PACKAGED_WEIGHTS", "load_checkpoint", "load_model", "read_state_dict", "resolve_data_config"]
