"""What a Trainer run needs around the engine: strategies, checkpoint files, console, CSV logs,
pictures, trainer helpers. Imports the engine and below, never the config or the commands."""
