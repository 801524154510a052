"""optipipe's Hydra config package. Importing it (Hydra does, before composing) registers the
defaults of every built-in settings dataclass as a config named ``defaults_<Class>``; a YAML file
starts from one and holds only its ``_target_`` and what differs::

    defaults:
      - /defaults_GenerateConfig@_here_
      - _self_
    _target_: stages.generate.Generate
    engine: fast

Every key is then present in the composed config, so ``generate.batch_size=8`` overrides it and
``optipipe --cfg job`` shows it, while the value itself is written once, in the dataclass.
"""

from __future__ import annotations

import dataclasses

from hydra.core.config_store import ConfigStore

from pipeline.config import SECTIONS
from stages import settings


def register() -> None:
    store = ConfigStore.instance()
    for schema in [*SECTIONS.values(), *settings.ALL]:
        store.store(name=f"defaults_{schema.__name__}", node=dataclasses.asdict(schema()))


register()
