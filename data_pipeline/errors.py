"""The one exception the pipeline raises for bad input: its message is a single line that names
the file, line or key and says what to do. The CLI prints it and exits with status 2."""


class InputError(ValueError):
    pass

