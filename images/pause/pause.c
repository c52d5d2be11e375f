/* The test bed's pause image: a pod's sandbox process. It sleeps until SIGTERM or SIGINT and then
 * exits 0; as PID 1 of a pod that shares its process namespace it also reaps orphaned children.
 * Built static (scripts/build-images compiles it on the build machine: the image is FROM scratch). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signo) {
    (void)signo;
    _exit(0);
}

static void reap(int signo) {
    (void)signo;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && argv[1][0] == '-' && argv[1][1] == 'v') {
        puts("pause (laion-operator test bed)");
        return 0;
    }
    struct sigaction act = {0};
    sigemptyset(&act.sa_mask);
    act.sa_handler = stop;
    if (sigaction(SIGTERM, &act, NULL) < 0 || sigaction(SIGINT, &act, NULL) < 0) {
        perror("pause: sigaction");
        return 1;
    }
    act.sa_handler = reap;
    act.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    if (sigaction(SIGCHLD, &act, NULL) < 0) {
        perror("pause: sigaction");
        return 1;
    }
    for (;;) {
        pause();
    }
}
