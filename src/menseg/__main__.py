from menseg.cli import main

main()
