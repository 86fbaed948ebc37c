from hvbatch.cli import console_main

console_main()
