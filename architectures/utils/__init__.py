"""The ground floor: what every folder of the zoo may import, and which imports nothing of the zoo.

- `device`: which device and number format a command runs in (`--device`, `--dtype`);
- `command_line`: one `error: ...` line for a user's mistake, the zoo's ArgumentParser and its
  shared `--device` option;
- `config`: typed dataclass configs: presets, `--key value` overrides, JSON round trips;
- `files`: atomic writes and the JSON / JSON-lines files commands read back;
- `timing`: timing candidates that take turns, fair on a shared machine;
- `wrappers`: the model inside DDP and torch.compile wrappers.
"""
