"""The applications: pretrain, eval, export, finetune, consolidate. Hydra entry points; nothing in
the library imports them."""
