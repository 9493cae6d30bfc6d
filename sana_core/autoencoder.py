def load_autoencoder(path, *, dtype=None, device=None, **hints):
    raise NotImplementedError
