"""Release forms made from a release kind's request model, so a newly registered kind gets its form
without console code: a segment field becomes a choice of segments, a breakdown a choice of allowed
dimensions, a list of literals a set of checkboxes, a number a number box, a mapping a JSON box. The
posted form is validated by the same pydantic model the API validates its body with."""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData

from privseg.errors import InvalidInput, describe_validation_error

SEGMENT_FIELDS = {"segment", "segments", "treatment", "control", "conversion"}
DIMENSION_FIELDS = {"breakdown", "attributes"}  # profile dimensions: a choice among the allowed ones
SKIPPED = {"dry_run"}


Widget = Literal["select", "multiselect", "ordered", "checkboxes", "number", "json", "text"]


@dataclass(frozen=True)
class FormField:
    name: str
    label: str
    help: str
    widget: Widget
    choices: list[str] = field(default_factory=list)
    required: bool = False
    default: Any = None
    slots: int = 0  # "ordered": how many ordered choices (the list's maximum length)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def fields(model: type[BaseModel], segments: list[str], dimensions: list[str]) -> list[FormField]:
    out = []
    for name, info in model.model_fields.items():
        if name in SKIPPED:
            continue
        annotation = _strip_optional(info.annotation)
        is_list = get_origin(annotation) is list
        inner = get_args(annotation)[0] if is_list else annotation
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        widget: Widget = "text"
        choices: list[str] = []
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        slots = next((int(m.max_length) for m in info.metadata if getattr(m, "max_length", None)), 0)
        if name in SEGMENT_FIELDS and is_list and extra.get("ordered"):
            widget, choices = "ordered", segments  # order matters: one choice per position
        elif name in SEGMENT_FIELDS:
            widget, choices = ("multiselect" if is_list else "select"), segments
        elif name in DIMENSION_FIELDS:
            widget, choices = "checkboxes", dimensions
        elif is_list and get_origin(_strip_optional(inner)) is Literal:
            widget, choices = "checkboxes", [str(v) for v in get_args(inner)]
        elif get_origin(annotation) is Literal:
            widget, choices = "select", [str(v) for v in get_args(annotation)]
        elif annotation in (int, float):
            widget = "number"
        elif get_origin(annotation) is dict or annotation is dict or _is_model(inner):
            widget = "json"  # a mapping, or a list of structured items (e.g. persona features)
        out.append(
            FormField(
                name=name,
                label=name.replace("_", " "),
                help=info.description or "",
                widget=widget,
                choices=choices,
                required=info.is_required(),
                default=default,
                slots=slots,
            )
        )
    return out


def parse(model: type[BaseModel], form: FormData, *, dry_run: bool) -> Any:
    """The request a posted form describes, validated by ``model``; errors name the field."""
    data: dict[str, Any] = {"dry_run": dry_run}
    for name, info in model.model_fields.items():
        if name in SKIPPED:
            continue
        annotation = _strip_optional(info.annotation)
        if get_origin(annotation) is list and not _is_model(get_args(annotation)[0]):
            values = [str(v) for v in form.getlist(name) if str(v)]
            if values:
                data[name] = values
            continue
        raw = str(form.get(name) or "").strip()
        if not raw:
            continue
        if get_origin(annotation) in (dict, list) or annotation is dict:
            try:
                data[name] = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise InvalidInput(
                    f"{name}: not valid JSON (line {exc.lineno}, column {exc.colno})"
                ) from None
        else:
            data[name] = raw
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(describe_validation_error(exc)) from None


def hidden(request: BaseModel) -> list[tuple[str, str]]:
    """A validated request as hidden form fields (name, value), to post it again to spend it."""
    out: list[tuple[str, str]] = []
    for name, value in request.model_dump(exclude={"dry_run"}).items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            out.append((name, json.dumps(value)))
        elif isinstance(value, list):
            out.extend((name, str(v)) for v in value)
        elif isinstance(value, dict):
            out.append((name, json.dumps(value)))
        elif value is not None:
            out.append((name, str(value)))
    return out
