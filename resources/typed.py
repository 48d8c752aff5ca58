"""Dagster config classes made from the library's pydantic models, so each setting is declared
once (in `vla_pipeline`) and the UI's launchpad still shows every field with its type, default,
bounds and description."""

from enum import Enum
from typing import Any, Literal, Optional, get_args, get_origin

import dagster as dg
from pydantic import BaseModel, create_model
from pydantic.fields import FieldInfo


def _fields(model: type[BaseModel], exclude: tuple[str, ...]) -> dict[str, FieldInfo]:
    return {name: info for name, info in model.model_fields.items() if name not in exclude}


def dagster_config(model: type[BaseModel], name: str, base: type = dg.Config, defaults: BaseModel | None = None,
                   exclude: tuple[str, ...] = ()) -> type:
    """A `base` subclass (dg.Config or a ConfigurableResource with methods) with `model`'s fields;
    `defaults` (an instance of `model`) replaces their default values."""
    fields: dict[str, Any] = {}
    for field_name, info in _fields(model, exclude).items():
        default = getattr(defaults, field_name) if defaults is not None else info.default
        fields[field_name] = (info.annotation, FieldInfo.merge_field_infos(info, default=default))
    return create_model(name, __base__=base, __doc__=model.__doc__, __module__=base.__module__, **fields)


def _shown(value: Any) -> str:
    return "none" if value is None else str(value)


class OptionalSettings(dg.Config):
    """Settings whose fields are all optional; None is unset."""

    def values_set(self) -> dict[str, Any]:
        """The fields set, by name, with their choices as the model's plain values."""
        return {name: value.value if isinstance(value, Enum) else value for name, value in self if value is not None}


def _optional(annotation: Any, enum_name: str) -> Any:
    # Dagster reads Optional[Literal] as no config type, but Optional[Enum] as a choice that may be
    # left out: the launchpad still lists the choices and refuses others before the run starts.
    if get_origin(annotation) is Literal:
        annotation = Enum(enum_name, {choice: choice for choice in get_args(annotation)})
    return Optional[annotation]


def optional_dagster_config(model: type[BaseModel], name: str, setups: dict[str, BaseModel],
                            exclude: tuple[str, ...] = ()) -> type[OptionalSettings]:
    """An OptionalSettings with `model`'s fields, types and bounds, each optional: unset (None) stands
    for the value of whichever setup (an instance of `model`) a run picks, so a value set always
    applies, even one equal to a default. Each description ends with every setup's default, one where
    all agree: `(default: 3 full size, 20 CPU preset)`; `setups` maps the setups' names to them."""
    fields: dict[str, Any] = {}
    for field_name, info in _fields(model, exclude).items():
        defaults = {setup: getattr(values, field_name) for setup, values in setups.items()}
        if None in defaults.values() and set(defaults.values()) != {None}:
            # None would mean both "no value" and "this setup's value": it could not be chosen.
            raise ValueError(f"{model.__name__}.{field_name}: its default is None in one setup and not in "
                             f"another ({defaults}); give it a default that is not None")
        if len(set(map(repr, defaults.values()))) == 1:
            shown = _shown(next(iter(defaults.values())))
        else:
            shown = ", ".join(f"{_shown(value)} {setup}" for setup, value in defaults.items())
        description = f"{info.description or field_name} (default: {shown})"
        fields[field_name] = (_optional(info.annotation, f"{name}_{field_name}"),
                              FieldInfo.merge_field_infos(info, default=None, description=description))
    return create_model(name, __base__=OptionalSettings, __doc__=model.__doc__, __module__=__name__, **fields)
