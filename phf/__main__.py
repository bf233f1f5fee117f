from phf.launch import main

main()
