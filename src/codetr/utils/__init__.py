"""Application helpers: OmegaConf resolvers, guarded Hydra instantiation, config printing."""

from codetr.utils.config_keys import check_known_keys
from codetr.utils.instantiate import check_targets, instantiate_checked
from codetr.utils.resolvers import lookup, milestones_for, register_resolvers

__all__ = ["check_known_keys", "check_targets", "instantiate_checked", "lookup", "milestones_for", "register_resolvers"]
