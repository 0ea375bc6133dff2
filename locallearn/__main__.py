from locallearn.cli import main

main()
