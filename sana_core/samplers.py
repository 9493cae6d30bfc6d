def sample(*args, **kwargs):
    raise NotImplementedError
