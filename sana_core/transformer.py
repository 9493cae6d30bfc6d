def load_transformer(path, *, dtype=None, device=None, **hints):
    raise NotImplementedError
