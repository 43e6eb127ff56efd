cc -std=c99 -Wall -Wextra -Wpedantic -Werror -g -I. -Itests -pthread -O2   -pthread -lm
