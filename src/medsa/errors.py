"""User-facing errors.

Anything a user can cause (bad shapes, corrupt files, empty masks, NaNs, prompts outside the image,
a checkpoint that does not match) raises a subclass of :class:`MedsaError` with a message that says
what is wrong and, where possible, how to fix it. The CLI prints these without a traceback.
"""

from __future__ import annotations


class MedsaError(Exception):
    """Base class of errors whose message is meant for the user."""


class CheckpointError(MedsaError):
    """A checkpoint is missing, unreadable, or does not match the model."""


class DataError(MedsaError):
    """An image, volume, mask or dataset is unreadable or inconsistent."""


class PromptError(MedsaError):
    """A prompt is malformed or lies outside the image."""


class ConfigError(MedsaError):
    """A configuration value is invalid."""
