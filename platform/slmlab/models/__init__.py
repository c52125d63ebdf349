"""Model families. Importing this package registers every family (one file each)."""
from slmlab.models.base import FAMILIES, Family, FamilyConfig, ModelOutput, build_model, count_parameters  # noqa: F401
from slmlab.models import vectorslm  # noqa: F401  (registers "vectorslm")
from slmlab.models import new_llm  # noqa: F401  (registers "new_llm")
from slmlab.models import alemoe_vlm  # noqa: F401  (registers "alemoe_vlm")
from slmlab.models import move  # noqa: F401  (registers "move")
