"""CLI sub-commands, one module each: ``add_arguments(parser)`` and ``run(args) -> int``.

``COMMANDS`` maps the sub-command name to its module (imported lazily, so ``advdefense --help``
stays fast). ``analyze`` has its own sub-commands (``ANALYSES``).
"""

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "demo": ("advdefense.commands.demo", "train standard + PGD-AT smallcnn on mnist5k and report"),
    "train": ("advdefense.commands.train", "train a model from a YAML config"),
    "evaluate": ("advdefense.commands.evaluate",
                 "evaluate a checkpoint or any model against attacks/suites"),
    "certify": ("advdefense.commands.certify",
                "certify the smoothed version of a model (Cohen et al.)"),
    "reproduce": ("advdefense.commands.reproduce", "train and evaluate every defense; one report"),
    "zoo": ("advdefense.commands.zoo", "list the model zoo (zoo:<preset>/<entry>-s<seed>)"),
}

ANALYSES: dict[str, tuple[str, str]] = {
    "transfer": ("advdefense.commands.analyze_transfer",
                 "transferability matrix across norms (RNA)"),
    "channels": ("advdefense.commands.analyze_channels", "channel activation statistics (CAS)"),
    "smoothing": ("advdefense.commands.analyze_smoothing", "sigma / m sweeps of smoothing"),
}
