"""The SR networks the paper fine-tunes (EDSR, ESRGAN, SwinIR, HAT): building presets, loading official weights,
saving fine-tuned weights in the same key layout.

EDSR is our own module (`edsr.py`, the EDSR-PyTorch key layout; BasicSR keys are renamed on load). ESRGAN (RRDBNet),
SwinIR and HAT are spandrel's architecture classes, loaded with `spandrel.ModelLoader().load_from_state_dict`,
which detects the architecture and its hyper-parameters from the weights alone, so any official checkpoint of those
families loads without a config. Nothing is downloaded: weights come from a path.

Every network maps x: (N, 3, h, w) in [0, 1] to (N, 3, scale*h, scale*w).
"""

# The registry's names, torch-free (the CLI's choices); the networks are in networks.py.
ARCHITECTURES: tuple[str, ...] = ("edsr", "esrgan", "swinir", "hat")
PRESET_NAMES: tuple[str, ...] = ("paper", "tiny")


def check_architecture(architecture: str) -> None:
    """The one check of an SR architecture's name (fine-tune, eval, the networks): a one-line error listing the
    known ones."""
    from factory.config import FactoryError

    if architecture not in ARCHITECTURES:
        raise FactoryError(f"unknown SR architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
