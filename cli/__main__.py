from . import main

if __name__ == "__main__":   # not when a spawned worker (zolite ablate --jobs) imports this as __mp_main__
    main()
