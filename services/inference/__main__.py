from services.inference.service import main

main()
