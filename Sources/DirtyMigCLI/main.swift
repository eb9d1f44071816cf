print("dirtymig")
