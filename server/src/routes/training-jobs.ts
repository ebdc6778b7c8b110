import type { Routes } from '../http.js';

export const trainingJobRoutes: Routes = {};
