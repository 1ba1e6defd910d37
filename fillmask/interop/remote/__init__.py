"""Files that ``fillmask export`` copies into transformers folders whose model has no class in
transformers (``trust_remote_code=True`` loads them). They import torch and transformers only,
never fillmask: the folder must load where fillmask is not installed."""
