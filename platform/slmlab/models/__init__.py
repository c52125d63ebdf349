"""Model families. Importing this package registers every family (one file each)."""
from slmlab.models import (
    alemoe_vlm,  # noqa: F401  (registers "alemoe_vlm")
    move,  # noqa: F401  (registers "move")
    new_llm,  # noqa: F401  (registers "new_llm")
    vectorslm,  # noqa: F401  (registers "vectorslm")
)
from slmlab.models.base import FAMILIES, Family, FamilyConfig, ModelOutput, build_model, count_parameters  # noqa: F401
