"""Dagster config classes made from the library's pydantic models, so each setting is declared
once (in `vla_pipeline`) and the UI's launchpad still shows every field with its type, default,
bounds and description."""

from typing import Any

import dagster as dg
from pydantic import BaseModel, create_model
from pydantic.fields import FieldInfo


def dagster_config(model: type[BaseModel], name: str, base: type = dg.Config, defaults: BaseModel | None = None,
                   exclude: tuple[str, ...] = ()) -> type:
    """A `base` subclass (dg.Config or a ConfigurableResource with methods) with `model`'s fields;
    `defaults` (an instance of `model`) replaces their default values."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        if field_name in exclude:
            continue
        default = getattr(defaults, field_name) if defaults is not None else info.default
        fields[field_name] = (info.annotation, FieldInfo.merge_field_infos(info, default=default))
    return create_model(name, __base__=base, __doc__=model.__doc__, __module__=base.__module__, **fields)
