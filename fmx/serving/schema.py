"""The HTTP API's request and response bodies (pydantic), built from the service's limits so
that the OpenAPI spec states them."""


import enum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

INT32 = 2**31 - 1


class Strict(BaseModel):
  model_config = ConfigDict(extra="forbid")


class Error(BaseModel):
  detail: str = Field(description="what went wrong and what to do")


class Health(BaseModel):
  status: str
  fm_version: int | None = None
  expert_versions: dict[str, int] | None = None


class Scored(BaseModel):
  item: int
  score: float = Field(description="the surface's value model: weighted sum of task scores")
  tasks: dict[str, float] = Field(description="the expert's probability per task of the surface")
  fm_tasks: dict[str, float] = Field(description="the FM's own probability per task")


class Ranked(BaseModel):
  surface: str
  fm_version: int
  expert_version: int
  request_time: int
  history_cache: str = Field(description="hit | append | miss | off (no user_id or no cache)")
  candidates: list[Scored] = Field(description="sorted by score, best first")


def request_models(surfaces, *, max_history: int, max_candidates: int, content_dim: int):
  """(Surface enum, RankRequest model) for these surfaces and limits."""
  Surface = enum.Enum("Surface", {s: s for s in surfaces}, type=str)  # pylint: disable=invalid-name
  Finite = Annotated[float, Field(allow_inf_nan=False)]

  class Event(Strict):
    item: int = Field(ge=-INT32, le=INT32, description="item id (1..num_items)")
    time: int = Field(ge=0, le=INT32, description="unix seconds; history in time order")
    action: int = Field(ge=1, le=3, description="1 + like + love")
    surface: Surface | None = Field(None, description="default: the item's surface")

  class Candidate(Strict):
    item: int = Field(ge=-INT32, le=INT32, description="item id (1..num_items)")
    content: list[Finite] | None = Field(
        None, min_length=content_dim, max_length=content_dim,
        description="fresh content features for the expert (default: the item table's)")

  class RankRequest(Strict):
    user_id: str | None = Field(None, min_length=1, max_length=128,
                                description="caches this user's encoded history between requests")
    request_time: int | None = Field(None, ge=0, le=INT32, description="unix seconds; default: now")
    history: list[Event] = Field(min_length=1, max_length=max_history,
                                 description="the user's most recent events, oldest first")
    candidates: list[Candidate] = Field(min_length=1, max_length=max_candidates)
    top_k: int | None = Field(None, ge=1, description="return only the best k")

  return Surface, RankRequest
