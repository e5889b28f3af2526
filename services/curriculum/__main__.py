from services.curriculum.service import main

main()
