"""The policy sections of the composing strategies: `fusion:` (a panel, then a synthesiser) and
`chain:` (a planner splits the request into steps for specialists, then a synthesiser).

In both, the route's `targets` (ranked by the router, with the route's `fallbacks`) are the
synthesiser: the model that writes the one answer the client gets. See docs/compositions.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from concilium.policy.errors import PathError

# The synthesiser's instructions. `{answers}` is replaced by the numbered answers (or step results).
SYNTHESIS_PROMPT = (
    "Several assistants answered the user's latest message independently. Their answers follow.\n\n"
    "{answers}\n\n"
    "Write the single best reply to the user: keep what is correct and useful in these answers, drop "
    "what is wrong, resolve disagreements by reasoning, and do not mention the assistants or that there "
    "were several answers."
)
CHAIN_SYNTHESIS_PROMPT = (
    "Specialists worked on parts of the user's latest message. Their results follow.\n\n"
    "{answers}\n\n"
    "Write one coherent reply to the whole request from these results. Correct anything that is wrong, "
    "and do not mention the specialists or the steps."
)
# A Mixture-of-Agents layer after the first: the proposer sees the previous layer's answers.
REFINE_PROMPT = (
    "Other assistants answered the user's latest message as follows.\n\n{answers}\n\n"
    "Use what is right in them and answer the user's message yourself, as well as you can."
)
# A model planner's instructions; `{max_steps}` and `{categories}` are filled in.
PLANNER_PROMPT = (
    "Split the user's latest message into at most {max_steps} self-contained steps that specialists can "
    "do separately. Reply with JSON only, in this shape:\n"
    '{{"steps": [{{"id": "s1", "task": "what to do", "category": "one of {categories}", '
    '"after": []}}]}}\n'
    '"after" lists the ids of earlier steps whose results this step needs. A request with one part is '
    "one step."
)
# A chain step's instructions, above the step's own task.
STEP_PROMPT = "You do one part of a larger request. Do only this part, completely:\n{task}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Common(_Strict):
    prompt: str | None = None  # the synthesiser's instructions (must contain {answers}); null: the default
    on_error: Literal["skip", "fail"] = "skip"  # a failed panelist or step: leave it out, or fail the request
    call_timeout_s: float | None = Field(None, gt=0)  # each panel or step call
    timeout_s: float | None = Field(None, gt=0)  # everything before the synthesis
    # A key whose budget cannot cover the whole fan-out: refuse (429) or answer with `single`.
    on_budget: Literal["refuse", "single"] = "refuse"

    @model_validator(mode="after")
    def _prompt(self) -> _Common:
        if self.prompt is not None and "{answers}" not in self.prompt:
            raise PathError([(("prompt",), "the synthesiser prompt must contain {answers}, where the answers go")])
        return self


class Fusion(_Common):
    """`strategy: fusion`: every panelist answers the request (concurrently); the route's targets
    synthesise one answer from theirs.

    panel     the panel's models; a name may repeat
    top_k     use only the k panel models the router rates best, distinct upstream models first
    samples   each panelist answers this many times with different seeds (one model + samples: Self-MoA)
    layers    Mixture-of-Agents: layers after the first answer again, seeing the previous layer's answers
    quorum    the fewest panel answers the synthesis may be written from
    """

    panel: list[str] = Field(min_length=1, max_length=8)
    top_k: int | None = Field(None, ge=1, le=8)
    samples: int = Field(1, ge=1, le=8)
    layers: int = Field(1, ge=1, le=3)
    quorum: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _sizes(self) -> Fusion:
        width = min(self.top_k or len(self.panel), len(self.panel)) * self.samples
        if self.top_k is not None and self.top_k > len(self.panel):
            raise PathError([(("top_k",), f"{self.top_k} is more than the panel's {len(self.panel)} models")])
        if self.quorum > width:
            raise PathError([(("quorum",), f"{self.quorum} is more than the {width} answers a panel layer gives")])
        if width * self.layers > 16:
            raise PathError([(("panel",), f"{width} answers x {self.layers} layers is more than 16 calls")])
        return self


class Chain(_Common):
    """`strategy: chain`: a planner splits the request into steps; each step goes to the specialist
    for its category; the route's targets synthesise the answer from the steps' results.

    planner      `rules` (numbered or bulleted parts, or separate questions) or a model name (asked
                 for a JSON plan; an invalid plan falls back to `single`, and the plan says so)
    specialists  category -> model (code: coder, math: mathematician, ...); `default` for the rest;
                 a category with neither goes to the route's first target
    max_steps    a plan with more steps falls back to `single`
    max_depth    the longest chain of steps that wait for each other
    """

    planner: str = "rules"
    planner_prompt: str | None = None
    specialists: dict[str, str] = Field(default_factory=dict)
    max_steps: int = Field(4, ge=1, le=8)
    max_depth: int = Field(3, ge=1, le=8)

    @model_validator(mode="after")
    def _categories(self) -> Chain:
        from concilium.policy.schema import CATEGORIES

        bad = [((("specialists", c),), f"unknown category {c!r}; expected `default` or one of {', '.join(CATEGORIES)}")
               for c in self.specialists if c != "default" and c not in CATEGORIES]
        if bad:
            raise PathError([(loc, msg) for (loc,), msg in bad])
        return self


def models_named(section: Fusion | Chain) -> list[tuple[tuple, str]]:
    """(key path inside the section, model name) for every model the section names."""
    if isinstance(section, Fusion):
        return [(("panel", j), n) for j, n in enumerate(section.panel)]
    out = [(("specialists", cat), n) for cat, n in section.specialists.items()]
    if section.planner != "rules":
        out.append((("planner",), section.planner))
    return out
