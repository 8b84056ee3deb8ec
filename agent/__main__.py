"""``python -m agent --data DIR [--mqtt URL] [--rate R] [--telemetry-interval S]``."""

from agent.daemon import main

if __name__ == "__main__":
    raise SystemExit(main())
