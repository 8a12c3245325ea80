from zhllama.cli import main

main()
