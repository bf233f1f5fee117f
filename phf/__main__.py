from phf.run import main

main()
