from ralign.cli import main

main()
