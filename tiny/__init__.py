"""The tiny Dimple family: small, offline, deterministic Dimples for tests, examples and benchmarks.

Nothing here is remote code. A checkpoint's `trust_remote_code` files are the modules its model and processor
classes import (`remote_code.code_files`), and none of them imports this package; `checkpoint/` only holds copies.

- `build.py`: the tiny tokenizer, processor, model config and random model; writes a random checkpoint folder.
- `train.py`: trains the tiny Dimple bundled in `checkpoint/` on a synthetic shapes task.
- `bundled.py`: where the bundled checkpoint lives, its copies of the remote-code modules, and the routine that
  writes every tiny checkpoint folder.
- `checkpoint/`: data, not code: the trained checkpoint (weights, configs, tokenizer files, `example.png`, and
  copies of the remote-code modules so that it loads without the package). Never edited by hand.
- `__main__.py`: `python -m dimple.tiny build FOLDER | sync-code | train [options]`.
"""
