"""python -m simulator: serve a simulator until Ctrl-C (--help lists the options)."""

from simulator.running import main

if __name__ == "__main__":
    main()
