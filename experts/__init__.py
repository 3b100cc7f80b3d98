"""Offline expert tooling on top of the model package: train, distil and evaluate experts (`plugmoe
train-expert | distill | eval`, or `python -m experts ...`). The expert file format, its errors and the
admission report live in `moe`, where the server reads them too."""
