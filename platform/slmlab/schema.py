"""The one base class of every typed config: pipeline sections, model families, stages, search spaces.

Unknown keys are errors (a typo never silently falls back to a default) and assignments are
validated too. Deliberately free of torch and Ray so that ``slmlab validate`` stays fast.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
