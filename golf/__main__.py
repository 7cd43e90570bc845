from golf.cli import main

main()
