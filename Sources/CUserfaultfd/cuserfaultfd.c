#include "cuserfaultfd.h"
