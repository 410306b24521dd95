"""Task scripts and the [tasks] config section for tests that queue tasks."""


def task_script(directory, name, body):
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\nset -e\n" + body)
    path.chmod(0o755)
    return path


def tasks_config(directory, enabled=True):
    return f'[tasks]\nenabled = {"true" if enabled else "false"}\ndirectory = "{directory}"\n'
