import type { Routes } from '../http.js';

export const trajectoryRoutes: Routes = {};
