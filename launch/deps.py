"""Print the dependency list of pyproject.toml (base + chosen extras), one per line;
`--no-deps` prints the packages installed without their dependencies ([tool.graftrl] no_deps).

The Makefile installs these into an environment kept outside the clone, so the
repo's own packages are never copied into site-packages (they are run from the
checkout, which is always first on sys.path).
"""
import sys
import tomllib


def main() -> None:
    with open("pyproject.toml", "rb") as f:
        pyproject = tomllib.load(f)
    project = pyproject["project"]
    if sys.argv[1:] == ["--no-deps"]:  # packages installed without their declared dependencies
        print("\n".join(pyproject["tool"]["graftrl"]["no_deps"]))
        return
    extras = [e for e in sys.argv[1:] if e]
    deps = list(project["dependencies"])
    for extra in extras:
        if extra not in project["optional-dependencies"]:
            sys.exit(f"error: unknown extra {extra!r}; known: {sorted(project['optional-dependencies'])}")
        deps += project["optional-dependencies"][extra]
    print("\n".join(deps))


if __name__ == "__main__":
    main()
