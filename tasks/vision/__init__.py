"""Vision task: image classification models (ViT, MaxViT, Agent-DeiT), data modules and the
LightningModule.

Importing this package registers its model families with :mod:`zoo.registry` (their
``@register_model`` decorators run on import). The data modules (``zoo.tasks.vision.data``), the
LightningModule (``zoo.tasks.vision.module``) and the pictures (``zoo.tasks.vision.viz``) are imported
only where used, so listing models stays light.
"""
import importlib
import importlib.util

# Model family files in this package. A family whose file is not present in this checkout is skipped
# (families land one by one); an error *inside* a present file is raised, never hidden.
MODEL_FAMILIES = ("vit", "maxvit", "agent_deit")

for _family in MODEL_FAMILIES:
    if importlib.util.find_spec(f"{__name__}.{_family}") is not None:
        importlib.import_module(f"{__name__}.{_family}")
del _family
