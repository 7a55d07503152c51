"""labkit's command line (used by the Makefile):

    python -m labkit assets fetch [NAME ...]    fetch + convert pinned assets (make setup)
    python -m labkit assets verify [NAME ...]   re-hash the cache
    python -m labkit assets list
    python -m labkit check                      [OK]/[FAIL] per dependency
    python -m labkit run --profile full --out build/run notebooks/*.ipynb   (make run)
    python -m labkit questions [--check]        QUESTIONS.md from the notebooks' open questions
"""
import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in {"assets", "check", "run", "questions"}:
        print(__doc__)
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    command, rest = argv[0], argv[1:]
    if command == "assets":
        from .assets import main as assets_main
        return assets_main(rest)
    if command == "check":
        from .envcheck import main as check_main
        return check_main()
    if command == "questions":
        from .questions import main as questions_main
        return questions_main(rest)
    from .runner import main as run_main
    return run_main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
