"""The experiment configs, installed as the package `fastadv_jax.configs` (setup.py maps this
folder there). Each file has `get_config([arg])`; pass it to the trainer by path:
`python -m fastadv_jax.main --config=configs/cifar10.py:gradalign,eps=8 --workdir=...`."""
