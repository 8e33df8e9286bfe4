#include "cli.h"

int main(int argc, char **argv) { return realm_main(argc, argv); }
